"""One worker process: the main loop and the per-segment runners with their watchdog."""
