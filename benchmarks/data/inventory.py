"""A small inventory module: items, stock levels and reorder suggestions."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Item:
    sku: str
    name: str
    price: float
    quantity: int = 0
    reorder_level: int = 5


class Inventory:
    def __init__(self) -> None:
        self._items: dict[str, Item] = {}

    def add_item(self, item: Item) -> None:
        if item.sku in self._items:
            raise ValueError(f"duplicate sku: {item.sku}")
        self._items[item.sku] = item

    def restock(self, sku: str, amount: int) -> int:
        if amount <= 0:
            raise ValueError("amount must be positive")
        item = self._items[sku]
        item.quantity += amount
        return item.quantity

    def sell(self, sku: str, amount: int = 1) -> float:
        item = self._items[sku]
        if amount > item.quantity:
            raise ValueError(f"only {item.quantity} left of {item.name}")
        item.quantity -= amount
        return round(item.price * amount, 2)

    def total_value(self) -> float:
        return round(sum(item.price * item.quantity for item in self._items.values()), 2)

    def low_stock(self) -> list[Item]:
        return [item for item in self._items.values() if item.quantity <= item.reorder_level]


def reorder_suggestions(inventory: Inventory, target: int = 20) -> dict[str, int]:
    """How many of each low-stock item to order to get back to ``target``."""
    return {item.sku: target - item.quantity for item in inventory.low_stock()}

