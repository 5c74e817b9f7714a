"""Generated recommendation data: queries and items with categorical features, power-law item
popularity and a tail split of items, no download.

The generative story (all draws from the DataModule's ``seed``):

* items: ``item_id``, a ``category``, a ``brand`` (each brand sells in one category, so brand and
  category are correlated, which is what correlated feature masking exploits) and a ``price``
  bucket; each item has a popularity ``p_j ∝ rank_j ** -popularity_exponent`` (Zipf), its rank a
  random permutation of the items;
* users: a favourite category, a favourite brand in it and a price level;
* an interaction: a user; the category asked for (the favourite with probability
  ``category_affinity``, else uniform); an item of that category drawn by popularity times the
  user's affinity (``brand_boost`` for the favourite brand, ``price_boost`` for the user's price
  level). The query is ``(user_id, category asked for, user's price level)``; the interacted item
  is the target.

Interactions are split at random into train / val / test. Tail items are those outside the
``head_fraction`` most popular ones (by the generating popularity, so the split is fixed before
training); every sample says whether its item is a tail item (``is_tail``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .base import DictDataModule, DictDataset

QUERY_FIELDS = ("user_id", "category", "price")
ITEM_FIELDS = ("item_id", "category", "brand", "price")


class RecommendationDataModule(DictDataModule):
    """Query–item interactions for retrieval, generated and split with the DataModule's ``seed``.

    Batches carry ``input`` (``(N, 3)`` long query features, :data:`QUERY_FIELDS`), ``target`` (the
    interacted item's id), ``item_features`` (``(N, 4)`` long, :data:`ITEM_FIELDS`), ``is_tail``
    and ``index``.

    Args:
        num_items, num_users, num_categories, num_brands, num_prices: vocabulary sizes
            (``num_brands ≥ num_categories``: every category has a brand).
        num_interactions: interactions generated in total, before the split.
        popularity_exponent: Zipf exponent of item popularity (0 = uniform).
        head_fraction: share of items, the most popular ones, that are not tail items.
        category_affinity: probability that a query asks for the user's favourite category.
        brand_boost, price_boost: factors on an item's draw weight for the user's favourite brand
            and price level.
        val_fraction, test_fraction: shares of interactions held out.
        **kwargs: :class:`~reglab.datamodules.base.DictDataModule` arguments.

    Attributes:
        query_cardinalities, item_cardinalities: vocabulary size per query / item field, known
            after ``__init__`` (``reglab`` fills a two-tower module's with them).
        item_features: ``(num_items, 4)`` long, the corpus (row ``j`` is item ``j``), after ``setup``.
        item_counts: ``(num_items,)`` training interactions per item, after ``setup``.
        tail_items: ``(num_items,)`` bool, after ``setup``.

    Example:
        >>> data = RecommendationDataModule(num_items=50, num_users=20, num_interactions=400, batch_size=8)
        >>> data.setup("fit")
        >>> batch = next(iter(data.train_dataloader()))
        >>> batch["input"].shape, batch["item_features"].shape, data.item_cardinalities
        (torch.Size([8, 3]), torch.Size([8, 4]), (50, 8, 16, 4))
    """

    def __init__(
        self,
        num_items: int = 400,
        num_users: int = 200,
        num_categories: int = 8,
        num_brands: int = 16,
        num_prices: int = 4,
        num_interactions: int = 8000,
        popularity_exponent: float = 1.0,
        head_fraction: float = 0.2,
        category_affinity: float = 0.8,
        brand_boost: float = 4.0,
        price_boost: float = 2.0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        **kwargs: Any,
    ) -> None:
        name = type(self).__name__
        if num_categories < 1 or num_prices < 1 or num_users < 1:
            raise ValueError(f"{name}: num_categories, num_prices and num_users must be at least 1.")
        if num_brands < num_categories or num_items < num_brands:
            raise ValueError(
                f"{name}: needs num_items ≥ num_brands ≥ num_categories (every category a brand, every brand an"
                f" item), got {num_items}, {num_brands}, {num_categories}. Fix: raise num_items / num_brands."
            )
        if not 0 < head_fraction < 1:
            raise ValueError(f"{name}: head_fraction must lie in (0, 1), got {head_fraction}.")
        if not 0 <= category_affinity <= 1 or popularity_exponent < 0 or brand_boost <= 0 or price_boost <= 0:
            raise ValueError(
                f"{name}: category_affinity must lie in [0, 1], popularity_exponent be ≥ 0 and the boosts > 0."
            )
        if val_fraction <= 0 or test_fraction <= 0 or val_fraction + test_fraction >= 1:
            raise ValueError(
                f"{name}: val_fraction and test_fraction must be > 0 and sum to < 1, got {val_fraction}, {test_fraction}."
            )
        super().__init__(**kwargs)
        self.num_items, self.num_users, self.num_interactions = num_items, num_users, num_interactions
        self.num_categories, self.num_brands, self.num_prices = num_categories, num_brands, num_prices
        self.popularity_exponent, self.head_fraction = popularity_exponent, head_fraction
        self.category_affinity, self.brand_boost, self.price_boost = category_affinity, brand_boost, price_boost
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.query_cardinalities = (num_users, num_categories, num_prices)
        self.item_cardinalities = (num_items, num_categories, num_brands, num_prices)
        self.item_features: Optional[Tensor] = None
        self.item_counts: Optional[Tensor] = None
        self.tail_items: Optional[Tensor] = None

    def _generate_items(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(item features, popularity)``."""
        brand_category = torch.arange(self.num_brands) % self.num_categories
        # the first num_brands items cover every brand once, the rest draw their brand
        brands = torch.cat([torch.arange(self.num_brands),
                            torch.randint(self.num_brands, (self.num_items - self.num_brands,), generator=generator)])
        brands = brands[torch.randperm(self.num_items, generator=generator)]
        prices = torch.randint(self.num_prices, (self.num_items,), generator=generator)
        features = torch.stack([torch.arange(self.num_items), brand_category[brands], brands, prices], dim=1)
        ranks = torch.randperm(self.num_items, generator=generator).double() + 1
        popularity = ranks ** -self.popularity_exponent
        return features, popularity / popularity.sum()

    def _generate_interactions(self, items: Tensor, popularity: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(query features, item ids)`` of every interaction."""
        n = self.num_interactions
        favourite_brand = torch.randint(self.num_brands, (self.num_users,), generator=generator)
        favourite_category = favourite_brand % self.num_categories
        price_level = torch.randint(self.num_prices, (self.num_users,), generator=generator)
        users = torch.randint(self.num_users, (n,), generator=generator)
        asks_favourite = torch.rand(n, generator=generator) < self.category_affinity
        category = torch.where(asks_favourite, favourite_category[users],
                               torch.randint(self.num_categories, (n,), generator=generator))
        weights = popularity.expand(n, -1) * (items[:, 1] == category[:, None])
        weights = weights * torch.where(items[:, 2] == favourite_brand[users, None], self.brand_boost, 1.0)
        weights = weights * torch.where(items[:, 3] == price_level[users, None], self.price_boost, 1.0)
        chosen = torch.multinomial(weights, 1, generator=generator)[:, 0]
        return torch.stack([users, category, price_level[users]], dim=1), chosen

    def setup(self, stage: Optional[str] = None) -> None:
        """Generates and splits the data; later calls do nothing."""
        if self.train_dataset is not None:
            return
        generator = torch.Generator().manual_seed(self.seed)
        items, popularity = self._generate_items(generator)
        queries, chosen = self._generate_interactions(items, popularity, generator)
        num_head = max(1, round(self.head_fraction * self.num_items))
        tail = torch.ones(self.num_items, dtype=torch.bool)
        tail[popularity.argsort(descending=True)[:num_head]] = False
        order = torch.randperm(self.num_interactions, generator=generator)
        num_val, num_test = round(self.val_fraction * len(order)), round(self.test_fraction * len(order))
        splits = {"val": order[:num_val], "test": order[num_val:num_val + num_test], "train": order[num_val + num_test:]}
        if any(len(members) == 0 for members in splits.values()):
            raise ValueError(f"{type(self).__name__}: a split is empty; raise num_interactions.")
        datasets = {
            split: DictDataset(queries[members], chosen[members],
                               {"item_features": items[chosen[members]], "is_tail": tail[chosen[members]]})
            for split, members in splits.items()
        }
        self.item_features, self.tail_items = items, tail
        self.item_counts = torch.bincount(chosen[splits["train"]], minlength=self.num_items)
        self.train_dataset, self.val_dataset, self.test_dataset = datasets["train"], datasets["val"], datasets["test"]
