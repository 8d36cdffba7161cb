"""The FUSE front end: ``dicomfs mount``. ``operations`` serves the views' tree and ``uploads/``
through pyfuse3; ``inodes`` numbers what the kernel sees; ``daemon`` mounts, signals, unmounts."""
