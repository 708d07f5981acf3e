"""Field deployment: install, bundle store, config over SSH, status/top, doctor, recorder."""
