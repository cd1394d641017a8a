"""Each church's sending number: bought from Telnyx and attached to a messaging profile."""
