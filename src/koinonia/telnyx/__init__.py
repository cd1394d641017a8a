"""Telnyx: the HTTP client, webhook signatures and the webhook inbox."""
