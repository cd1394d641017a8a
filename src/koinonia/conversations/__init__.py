"""The two-way inbox: one conversation per member, inbound and outbound texts."""
