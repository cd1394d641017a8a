"""Messaging: broadcasts, sending through Telnyx, receipts, inbound SMS and compliance."""
