"""A small SQLAlchemy application using Bemi's own package (bemi-sqlalchemy, from PyPI), for
tools/tests/bemi_package.rs.

  migrate URL   create the application's table and run the package's migration (its triggers)
  run URL       write under several contexts; print what the application set for each change,
                as JSON: [{"op", "id", "context"}] in the order the changes were made
"""
import json
import sys

from alembic.migration import MigrationContext
from alembic.operations import Operations
from bemi import Bemi
from sqlalchemy import Column, Integer, String, create_engine, delete, update
from sqlalchemy.orm import Session, declarative_base

Base = declarative_base()


class Order(Base):
    __tablename__ = "orders"
    id = Column(Integer, primary_key=True)
    customer_id = Column(Integer)
    status = Column(String)


def main():
    mode, url = sys.argv[1], sys.argv[2]
    engine = create_engine(url)
    if mode == "migrate":
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            with Operations.context(MigrationContext.configure(conn)):
                Bemi.migration_upgrade()
        print(json.dumps({"ok": True}))
        return
    made = []
    with Session(engine) as session:
        # One request: three orders created in one statement.
        create = {"user_id": 1, "endpoint": "/orders"}
        Bemi.set_context(create)
        session.add_all([Order(id=i, customer_id=1, status="new") for i in (1, 2, 3)])
        session.commit()
        made += [{"op": "CREATE", "id": i, "context": create} for i in (1, 2, 3)]
        # Another: two statements under two contexts in one transaction.
        pay, ship = {"user_id": 3, "step": "pay"}, {"user_id": 3, "step": "ship"}
        Bemi.set_context(pay)
        session.execute(update(Order).where(Order.id.in_([1, 2])).values(status="paid"))
        Bemi.set_context(ship)
        session.execute(update(Order).where(Order.id == 3).values(status="shipped"))
        session.commit()
        made += [{"op": "UPDATE", "id": i, "context": pay} for i in (1, 2)]
        made += [{"op": "UPDATE", "id": 3, "context": ship}]
        # A bound value with a double quote: psycopg2 interpolates it into the comment too,
        # so the trigger's message is not valid JSON (kept as a JSON string).
        quoted = {"user_id": 4, "step": "note"}
        Bemi.set_context(quoted)
        session.execute(update(Order).where(Order.id == 1).values(status='say "hi"'))
        session.commit()
        made += [{"op": "UPDATE", "id": 1, "context": "not json"}]
        # No context: no comment, no message.
        Bemi.set_context(None)
        session.execute(delete(Order).where(Order.id == 2))
        session.commit()
        made += [{"op": "DELETE", "id": 2, "context": None}]
    print(json.dumps(made))


main()
