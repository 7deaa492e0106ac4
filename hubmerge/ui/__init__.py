"""The web app (`hubmerge ui`, extra `hubmerge[ui]`): a Gradio page and API over `hubmerge.api`.

`service.py` holds what the app does (recipe text → problems at their lines, plan, one job at a time: a merge
or a search, push); `app.py` the page and the named endpoints `/validate`, `/plan` and `/merge`; `space.py`
the files of a Hugging Face Space.
"""
