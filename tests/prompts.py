"""Prompt sets used across tests: short, long, multilingual and code."""

LONG = (
    "The history of mountaineering is a story of curiosity, risk and technology. Early climbers in the Alps "
    "used simple hemp ropes and hobnailed boots; later generations brought pitons, carabiners and nylon. "
) * 12

PARITY_PROMPTS = [
    "Hello",
    "The capital of France is",
    "Write a short poem about the sea.",
    LONG + "In summary,",
    "Bonjour, je m'appelle Marie et j'habite à Lyon. Aujourd'hui, je vais",
    "東京は日本の首都です。東京の人口は",
    "def quicksort(arr):\n    \"\"\"Sort a list with quicksort.\"\"\"\n",
    "SELECT name, COUNT(*) FROM orders GROUP BY name ORDER BY",
]

MIXED_PROMPTS = [
    "Once upon a time",
    "List three colors:",
    "import numpy as np\n",
    "Q: What is 12 + 30?\nA:",
    LONG[:600],
    "The quick brown fox",
    "Translate to German: good morning",
    "In 1969, the first humans",
    "Dear hiring manager,",
    "for i in range(10):",
    "Water boils at",
    "My favourite food is",
    LONG[:1200] + " Next,",
    "¿Dónde está la biblioteca?",
    "Rules of chess: the king",
    "1, 1, 2, 3, 5, 8,",
]
