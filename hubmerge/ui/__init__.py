"""The web app (`hubmerge ui`, extra `hubmerge[ui]`): a Gradio page and API over `hubmerge.api`.

`service.py` holds what the app does (recipe text → problems at their lines, plan, one merge job at a time,
push); `app.py` the page and the named endpoints `/validate`, `/plan` and `/merge`.
"""
