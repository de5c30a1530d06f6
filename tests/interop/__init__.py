"""Interoperability tests: the service against third-party device-side tools (libcoap's
`coap-client-openssl`, the `openssl` CLI) instead of our own Python clients."""
