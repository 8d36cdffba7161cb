"""Views: the store's index as a browsable tree, shared by the FUSE mount and the WebDAV bridge.

Pure: no pyfuse3, wsgidav or HTTP here. One stored instance appears in every view and is stored once::

    /
    ├── by-patients/
    │   └── <PatientID> - <PatientName>/
    │       └── <StudyDate> - <StudyDescription>/
    │           └── <Modality> - <SeriesDescription>/
    │               └── <InstanceNumber> - <SOPInstanceUID>.dcm     e.g. 0007 - 1.2.840….dcm
    ├── by-studies/
    │   └── <PatientID> - <PatientName> - <StudyDescription>/
    │       └── <Modality> - <SeriesDescription>/
    │           └── <InstanceNumber> - <SOPInstanceUID>.dcm
    ├── by-dates/
    │   ├── <YYYY>/
    │   │   └── <YYYY-MM>/
    │   │       └── <PatientID> - <PatientName> - <StudyDescription>/
    │   │           └── <Modality> - <SeriesDescription>/
    │   │               └── <InstanceNumber> - <SOPInstanceUID>.dcm
    │   └── unknown/                        studies without a valid StudyDate
    │       └── <PatientID> - <PatientName> - <StudyDescription>/ …
    ├── by-uids/
    │   └── <StudyInstanceUID>/
    │       ├── study.json
    │       └── <SeriesInstanceUID>/
    │           ├── series.json
    │           └── <SOPInstanceUID>.dcm
    │   (a patient's, study's or series' folder holding an attachment also has a read-only
    │    attachments/ with <name><.ext of its MIME type>; an instance's are in its xattrs)
    ├── uploads/                            writable staging area: what is copied in is ingested
    └── jobs/                               read-only: <job id>.json for every export job

Names are made safe for every client and never change while their resource exists (``names``); listings
come from the index and are cached until the store changes (``tree``).
"""

from dicomfs.views.entries import Entry, EntryKind, Listing
from dicomfs.views.tree import ATTACHMENTS, JOBS, UPLOADS, VIEWS, NotAFolderError, Tree, attachment_mime, attachment_sha256

__all__ = ["ATTACHMENTS", "JOBS", "UPLOADS", "VIEWS", "Entry", "EntryKind", "Listing", "NotAFolderError", "Tree",
           "attachment_mime", "attachment_sha256"]
