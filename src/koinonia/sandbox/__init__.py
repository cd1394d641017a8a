"""A local stand-in for Telnyx and Stripe: same paths, auth, shapes, errors and signed
webhooks, plus a control surface (`/sandbox/...`) for tests, the dev run and demos."""
