"""The WebDAV bridge: serves the views over HTTP with wsgidav and cheroot."""
