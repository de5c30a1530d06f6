"""Provisioning: certificate authority, installer enrollments and EST-coaps (not built yet)."""
