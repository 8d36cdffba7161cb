"""dicomfs: a DICOM archive kept in an LMDB-indexed store, shown as files through FUSE and WebDAV."""

__version__ = "0.1.0"
