"""Provisioning: the fleet certificate authority and the rules for device CSRs.

Built so far: the pure certificate logic (`certificate_authority`, `csr_policy`). Still to
come (issue 3): CA storage shared by replicas, installer enrollments, EST-coaps resources.
"""
