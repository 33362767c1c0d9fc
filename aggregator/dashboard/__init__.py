"""The federation dashboard every aggregator serves at ``/dashboard`` (the root's shows the
whole tree): :mod:`~aggregator.dashboard.view` (what the aggregator knows, and the summary
it sends its parent), :mod:`~aggregator.dashboard.reports` (checking peers' reports),
:mod:`~aggregator.dashboard.summaries` (summaries up the tree on their own channel),
:mod:`~aggregator.dashboard.app` (the routes, the token, server-sent events) and
``static/`` (plain HTML, CSS and JavaScript; no build step). Nothing is imported here: the view needs no aiohttp."""
