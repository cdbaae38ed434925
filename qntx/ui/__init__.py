"""``qntx ui``: a live web dashboard over the scripting API.

``server`` starts it (aiohttp), ``routes`` answers the page's JSON requests and
actions, ``views`` turns API records into what the page shows, ``live`` pushes
the bus's events to open pages (server-sent events), ``access`` decides who may
connect and act. ``static/`` holds the page itself: plain HTML, CSS and one
script, served from the package, nothing fetched from elsewhere.
"""
