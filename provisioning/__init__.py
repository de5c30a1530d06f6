"""Provisioning: the fleet certificate authority and the rules for device CSRs.

Built so far: the pure certificate logic (`certificate_authority`, `csr_policy`,
`enrollment_codes`) and the CA's storage shared by replicas (`ca_store`). Still to come
(issue 3): installer enrollments, EST-coaps resources, revocation.
"""
