"""Views of a recording or a live session: text/CSV/JSON report, HTML page, plotly
figures, the live `top`, and the comparison's report."""
