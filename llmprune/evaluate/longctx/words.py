"""Fixed word lists for the synthetic long-context tasks (needle keys, the common-words list) and RULER's noise.

Built in so that task generation needs no download and is the same on every machine for a seed.
"""

from __future__ import annotations

#: RULER's "noise" haystack: repeated when no corpus is given.
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.")

#: Plain English nouns and adjectives (lower case, distinct).
WORDS: tuple[str, ...] = tuple("""
apple river garden window silver candle forest mirror bridge rocket pillow castle marble orange violet
anchor basket button cactus camera carpet cherry cloud coffee copper cotton crystal desert dragon eagle
engine feather finger flower fossil galaxy ginger glacier hammer harbor helmet island jacket jungle kettle
ladder lantern lemon magnet meadow monkey needle ocean olive oyster palace parrot pencil pepper pirate
planet pocket potato puzzle quartz rabbit radio rainbow ribbon saddle salmon shadow shovel spider spoon
statue sugar sunset tablet teapot ticket tiger tomato tower trumpet tulip turtle valley velvet wagon walnut
whistle wizard yogurt zebra acorn almond arrow banana barrel beacon blanket bottle breeze brick bubble
canyon carrot cedar chalk cheese circus clover cobalt comet coral cricket daisy dolphin donkey drum ember
falcon fiddle flame fountain garlic goblet granite grape harp hazel honey iris ivory jasmine jewel kayak
kitten koala lagoon lava lily linen lizard lobster maple melon meteor mint mitten moose mountain muffin
nectar nickel noodle nutmeg oak opal otter owl paddle panda peach pearl pebble pelican penguin pepperoni
pine plum pond poppy pumpkin quilt raven reef robin rose ruby sapphire scarf seal sequoia shell sierra
sparrow spruce squash squirrel star stone straw swan thistle thunder timber topaz torch tundra umbrella
vanilla vase vessel vine volcano waffle walrus wheat willow wolf yacht bold brave bright calm clever crisp
eager fancy gentle giant happy humble jolly lively lucky merry mighty noble proud quiet rapid shiny silent
smooth sturdy swift tidy vivid warm wild witty young
""".split())
