"""Simulated devices: real aiocoap clients that enroll, report, follow their desired state,
raise faults and go offline, for `citytwin simulate`, tests, benchmarks and demonstrations.

`devices.py` holds one device (its behaviour as pure functions, and the CoAP client that
acts on it); `fleet.py` runs many at once and counts what they do.
"""
