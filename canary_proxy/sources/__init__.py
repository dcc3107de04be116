"""Where config comes from: a local file or a Kubernetes ConfigMap. Each yields raw mappings."""
