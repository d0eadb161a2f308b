"""Running as a service: the systemd runtime (sd_notify, watchdog), its config, SIGHUP and reload.
"""
