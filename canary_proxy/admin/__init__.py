"""The admin port: health, readiness, /config, /metrics, the dashboard and its /stats."""
