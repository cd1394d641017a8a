"""Billing: plans, Stripe checkout and portal, subscription events, the segment ledger."""
