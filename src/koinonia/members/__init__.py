"""Members: a church's contacts, with encrypted phone and email, and their CSV import."""
