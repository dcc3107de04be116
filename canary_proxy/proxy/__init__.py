"""The data path: HTTP/1.1 from clients to the upstreams and back (see docs/requests.md)."""
