"""How duet's processes talk: the wire messages (msgpack), the endpoints of a run dir, the
request/reply server, who may connect (peer credentials, CURVE keys), sd_notify, signals,
logs and the figures that travel in telemetry. Imports nothing of duet's but the config."""
