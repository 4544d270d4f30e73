"""Runs waiting and running: submit, the local worker (heartbeat lease, reaper, cancel), sweeps of
recipes × seeds, and the Ray dispatcher that trains them on a cluster."""
