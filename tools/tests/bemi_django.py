"""Bemi's Django package (bemi-django, from PyPI) reading a `changes` table that pgtrail keeps
(`pgtrail export --layout bemi`), through its own model, router and query helpers, for
tools/tests/bemi_package.rs. Prints what the helpers answered, as JSON.

  HOST PORT DATABASE USER
"""
import json
import sys

import django
from django.conf import settings

host, port, database, user = sys.argv[1:5]
connection = {"ENGINE": "django.db.backends.postgresql", "NAME": database, "USER": user,
              "HOST": host, "PORT": port}
settings.configure(
    DATABASES={"default": connection, "bemi": connection},
    INSTALLED_APPS=["bemi"],
    DATABASE_ROUTERS=["bemi.routers.BemiDatabaseRouter"],
    USE_TZ=True,
)
django.setup()

from bemi.models import BemiChange  # noqa: E402  (after setup, as Django requires)

orders = BemiChange.objects.filter(table="orders")
answers = {
    # One record's history, newest first, as an audit page shows it.
    "order_1": [[c.operation, (c.after or {}).get("status"), c.context]
                for c in orders.filter(primary_key="1").desc()],
    # Every change a request made (jsonb containment on the context).
    "paid_by_context": sorted(c.primary_key for c in orders.context({"step": "pay"})),
    "updated_to_paid": sorted(c.primary_key for c in orders.updated().after({"status": "paid"})),
    # When a field changed.
    "status_of_3": [c.operation for c in BemiChange.objects.field_changed("orders", 3, "status").asc()],
    "diff_of_3": orders.filter(primary_key="3").updated().first().diff(),
    "deleted": [c.primary_key for c in orders.deleted()],
}
print(json.dumps(answers))
