"""``changerelay --demo``: the relay with no MongoDB to install — a built-in stand-in and a writer.

The stand-in is the test primary (``changerelay/primary/``): a MongoDB replica-set primary on
mockupdb that the real driver talks to over the wire protocol, listening on 127.0.0.1 only. A writer
thread plays a small shop: orders and customers inserted, updated (``$set``/``$unset``, nested
fields, arrays), replaced and deleted at a few changes per second, with dates and ObjectIds, so that
every part of the page has something to show. The page says plainly that the data is the demo's.
"""

from __future__ import annotations

import datetime
import random
import threading
from typing import TYPE_CHECKING, Any

from bson import ObjectId
from logzero import logger
from pymongo import MongoClient
from pymongo.database import Database

if TYPE_CHECKING:
    from .primary import TestPrimary

DATABASE = "shop"
HISTORY = 20_000       # change events the stand-in keeps (its "oplog"): bounded memory
KEEP = 40              # documents per collection before the writer deletes the oldest
STATUSES = ("new", "paid", "packed", "shipped", "delivered")
PRODUCTS = (("Espresso beans", 14.5), ("Pour-over kettle", 39.0), ("Ceramic cup", 9.9),
            ("Grinder", 119.0), ("Filter papers", 4.2), ("Scale", 24.0))
NAMES = ("Ada", "Grace", "Alan", "Barbara", "Edsger", "Frances", "Ken", "Margaret", "Linus")
CITIES = ("Lisbon", "Oslo", "Kyoto", "Lagos", "Quito", "Perth")


class Demo:
    """The stand-in and its writer; ``start()`` returns the connection string to watch."""

    def __init__(self, rate: float = 3.0, seed: int | None = None):
        self.rate = rate
        self.random = random.Random(seed)
        self._stop = threading.Event()
        self._primary: TestPrimary | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        from .primary import TestPrimary  # mockupdb: only the demo needs it at run time

        primary = self._primary = TestPrimary(history_limit=HISTORY).start()
        uri: str = primary.uri
        self._thread = threading.Thread(target=self._write, args=(uri,), name="demo-writer",
                                        daemon=True)
        self._thread.start()
        logger.info("demo: a built-in MongoDB stand-in on %s, written to %.0f times a second "
                    "(database %r); this is not your MongoDB", primary.address, self.rate,
                    DATABASE)
        return uri

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._primary is not None:
            self._primary.stop()

    def _write(self, uri: str) -> None:
        client: MongoClient[dict[str, Any]]
        with MongoClient(uri, serverSelectionTimeoutMS=5000) as client:
            shop = Shop(client[DATABASE], self.random)
            while not self._stop.wait(self.random.expovariate(self.rate)):
                try:
                    shop.step()
                except Exception:  # a demo that stops writing would look like a broken relay
                    logger.exception("demo: a write failed; the writer carries on")


class Shop:
    """One change per ``step()``, chosen so that the collections stay small and every operation
    type keeps appearing."""

    def __init__(self, db: Database[dict[str, Any]], rng: random.Random):
        self.orders = db.orders
        self.customers = db.customers
        self.random = rng
        self.customer_ids: list[ObjectId] = []
        self.order_ids: list[ObjectId] = []

    def step(self) -> None:
        if len(self.customer_ids) < 3 or self.random.random() < 0.08:
            self.new_customer()
        elif len(self.order_ids) < 3 or self.random.random() < 0.35:
            self.new_order()
        else:
            self.random.choice((self.advance_order, self.advance_order, self.edit_customer,
                                self.replace_order, self.cancel_order))()
        for ids, collection in ((self.order_ids, self.orders),
                                (self.customer_ids, self.customers)):
            if len(ids) > KEEP:
                collection.delete_one({"_id": ids.pop(0)})

    def new_customer(self) -> None:
        name = self.random.choice(NAMES)
        customer: dict[str, Any] = {
            "_id": ObjectId(), "name": name, "email": f"{name.lower()}@example.com",
            "address": {"city": self.random.choice(CITIES),
                        "zip": f"{self.random.randrange(10**4, 10**5)}"},
            "tags": self.random.sample(("vip", "newsletter", "wholesale", "beta"), 2),
            "since": _now(),
        }
        self.customers.insert_one(customer)
        self.customer_ids.append(customer["_id"])

    def new_order(self) -> None:
        picked = [(product, price, self.random.randint(1, 3))
                  for product, price in self.random.sample(PRODUCTS, self.random.randint(1, 3))]
        order: dict[str, Any] = {
            "_id": ObjectId(), "customer": self.random.choice(self.customer_ids),
            "status": "new",
            "items": [{"product": product, "price": price, "qty": qty}
                      for product, price, qty in picked],
            "total": round(sum(price * qty for _, price, qty in picked), 2), "placed": _now(),
        }
        self.orders.insert_one(order)
        self.order_ids.append(order["_id"])

    def advance_order(self) -> None:
        order_id = self.random.choice(self.order_ids)
        order = self.orders.find_one({"_id": order_id}) or {}
        status = order.get("status", "new")
        following = STATUSES[min(STATUSES.index(status) + 1, len(STATUSES) - 1)]
        update: dict[str, Any] = {"$set": {"status": following, f"history.{following}": _now()}}
        if following == "shipped":
            update["$set"]["tracking"] = {"carrier": "DHL",
                                          "code": f"JD{self.random.randrange(10**9)}"}
        if following == "delivered":
            update["$unset"] = {"tracking": ""}
        self.orders.update_one({"_id": order_id}, update)

    def edit_customer(self) -> None:
        self.customers.update_one(
            {"_id": self.random.choice(self.customer_ids)},
            {"$set": {"address.city": self.random.choice(CITIES), "updated": _now()}})

    def replace_order(self) -> None:
        order_id = self.random.choice(self.order_ids)
        order = self.orders.find_one({"_id": order_id})
        if order is not None:
            order["note"] = "re-entered by support"
            order["items"] = order["items"][:1]
            order["total"] = round(order["items"][0]["price"] * order["items"][0]["qty"], 2)
            self.orders.replace_one({"_id": order_id}, order)

    def cancel_order(self) -> None:
        order_id = self.order_ids.pop(self.random.randrange(len(self.order_ids)))
        self.orders.delete_one({"_id": order_id})


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)
