"""OTA firmware: signed artifacts and staged rollout campaigns (not built yet)."""
