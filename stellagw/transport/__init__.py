"""The service side: listeners microservices dial in to, one protocol per connection."""
