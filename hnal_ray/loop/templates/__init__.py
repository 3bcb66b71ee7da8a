"""The Jinja2 environment of the loop's pages (the report, the contact sheet), free of the report's
imports so that `manual.py` can render without them."""
import jinja2

TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("hnal_ray.loop", "templates"),
                               autoescape=jinja2.select_autoescape(["html.j2"]),
                               keep_trailing_newline=True)
