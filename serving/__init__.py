"""KServe model servers of shopml; ``python -m serving`` starts the recommender.

:class:`serving.recommender.RecommenderModel` is imported from its module, not here, so
that importing this package stays cheap (torch and KServe load only when needed).
"""
