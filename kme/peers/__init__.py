"""The peer KMEs as the domain calls them: the HTTPS client of their inter-KME interface and its messages.

Below the domain and above storage: the domain calls the client, the
inter-KME interface serves the same messages.
"""
