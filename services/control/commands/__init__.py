"""The `atomo` commands of the control service: serve, up, submit, runs, status, cancel, logs."""
