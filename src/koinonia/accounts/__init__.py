"""Churches, staff users, API keys, refresh tokens and authentication."""
