"""The provider-event inbox: every verified Telnyx and Stripe event, stored once."""
