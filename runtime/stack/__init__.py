"""`duet run`: the supervisor that starts and stops the processes of one robot as systemd
would, and the summary it writes at the end."""
