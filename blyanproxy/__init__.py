"""blyanproxy: a streaming reverse proxy and load balancer for GPU inference nodes."""
