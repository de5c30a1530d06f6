"""OTA firmware: signed artifacts, device-verifiable manifests and staged rollout campaigns.

The device protocol (what a device sees and says) is this package's contract with firmware
writers; the service side and the simulator both follow it.

A device's firmware job is the `firmware` object of its **desired** state, written only by a
campaign (never by API callers):

    firmware:
      version:   "2.1.0"                      target version (semantic version)
      sha256:    "<64 hex>"                   digest of the image, also its download name
      size:      262144                       bytes
      uri:       "/fw/<sha256>"               CoAP path on the same coaps+tcp connection
      signature: "<base64>"                   detached signature, or "" for an MCUboot image
                                              (its signature sits in its own TLV area)
      manifest:  "<base64>"                   signed SUIT envelope (draft-ietf-suit-manifest)
      action:    "download" | "install"       download only, or download and install
      attempt:   1, 2, ...                    bumped when the service asks for the same job again
                                              after a transient failure

The device downloads with block-wise GETs (RFC 7959 Block2) of `uri`, resuming from any block,
checks the digest (and the manifest), and reports progress in its **reported** state, after
LwM2M object 5 (state, update result):

    firmware:
      version:          running version (after a reboot: the new one, or the old one if the
                        bootloader fell back)
      security_counter: MCUboot security counter of the running image, when it has one
      job:              sha256 of the job the report is about
      state:            "idle" | "downloading" | "downloaded" | "updating"
      progress:         0..100, percent of the image downloaded
      result:           "none" | "success" | "failed"
      reason:           with "failed": "integrity" | "out_of_storage" | "unsupported" |
                        "connection_lost" | "install_error" | "rejected"
      detail:           free text for operators

Any change of the desired `firmware` object is a new instruction. A campaign withdraws a job
that failed (`firmware` removed) and reduces a successful one to `{version}`, so the twin is in
sync once the device runs it.

A job with action "download" is downloaded and kept (state "downloaded") until the action turns
"install" (the campaign opens the install window); "install" downloads if needed, then installs
(state "updating"), reboots and reports the version it runs. An execution succeeds only when the
device reports the target version after that; a device that comes back on its old version has
failed.
"""
