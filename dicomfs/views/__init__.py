"""The virtual tree of the store: what FUSE and WebDAV show, independent of either protocol."""
