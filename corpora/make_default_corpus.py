"""Writes corpora/the_lighthouse_keepers.txt, the embedded default corpus.

An original play written for textgen (text and this script: same licence as
the project), assembled from hand-written lines and sentence patterns with a
fixed seed, so the file is reproducible: `python corpora/make_default_corpus.py`.
Its structure is what a character model learns first and a reader recognises:
acts and scenes, stage directions in brackets, speaker names in capitals,
verse for the keepers and prose for the Inspector and the fishermen.
"""
import os
import random

TARGET_BYTES = 120_000
rng = random.Random(1878)

VERSE_SPEAKERS = ["MAREN", "TOBIAS", "OLD HALVARD", "ELSIE", "CAPTAIN ROOK"]
PROSE_SPEAKERS = ["THE INSPECTOR", "FIRST FISHERMAN", "SECOND FISHERMAN", "MRS. PELL"]

PLACES = [
    "The lamp room at the top of the tower. Night.",
    "The kitchen of the keepers' cottage. A fire in the grate.",
    "The harbour wall below the lighthouse. Wind and spray.",
    "The gallery outside the lantern. A storm is rising.",
    "The village inn. Fishermen at a long table.",
    "The rocks at low tide. Grey morning.",
    "The stair of the tower, turning upward into dark.",
    "The Inspector's lodging. Papers on every chair.",
]

DIRECTIONS = [
    "Enter {a} with a lantern.", "Enter {a} and {b}.", "Exit {a}.", "Exeunt {a} and {b}.",
    "{a} trims the wick.", "Thunder. The lamp gutters and recovers.", "{a} looks out to sea.",
    "A bell, far off.", "{a} sits and does not answer.", "Enter {a}, wet through.",
    "{a} winds the clockwork of the lens.", "The wind throws the door open. {a} shuts it.",
    "{a} reads from the log-book.", "A ship's horn, twice.", "{a} laughs in spite of {pron}self.",
]

OPENINGS = ["O", "Now", "Yet", "And", "But", "See,", "Hark,", "Good", "Come,", "Still", "Alas,", "Then"]
SUBJECTS = [
    "the sea", "the light", "the tide", "the wind", "my brother", "the night", "the lamp", "the old man",
    "the harbour", "the storm", "this tower", "the keeper", "the ships", "the rocks", "the gulls", "my heart",
    "the morning", "the fog", "the bell", "our father", "the lantern", "the dark water", "the village",
]
VERBS = [
    "is a patient thief", "will keep its watch", "remembers every wreck", "turns upon its wheel",
    "has eaten half the shore", "was never kind to us", "must burn until the dawn", "goes grey before the gale",
    "keeps faith with those at sea", "forgets the names of men", "will not let me sleep", "calls out across the bay",
    "holds more than it will tell", "is older than the church", "has heard my every prayer",
    "grows heavy with the rain", "would drown a better man", "lies quiet as a grave", "speaks in salt and iron",
]
CLOSINGS = [
    "tonight", "for ever", "till morning", "and all its ships", "as it did before", "and no one hears",
    "while we keep the flame", "beneath the turning glass", "and God knows why", "upon the western rocks",
    "though the oil runs low", "and so must we", "before the bell", "in the long dark",
]
FIXED_VERSE = [
    "Keep the lamp, and the lamp will keep the sea.",
    "There is no shore so far the light can't find it.",
    "I have counted every wave since I was born.",
    "The glass turns once a minute, and we with it.",
    "Who trims the wick at midnight trims his fear.",
    "A keeper's life is oil and wind and waiting.",
    "The ships go by and never know our names.",
    "My father kept this light for forty years.",
    "Let the storm come. The stair is long, but mine.",
    "What the sea takes it gives back in the spring.",
    "I heard a voice beneath the water calling.",
    "The beam goes out and comes again, like breath.",
    "Here is the log. Here is the hour. Here am I.",
    "We are small, but the light is not small.",
]
PROSE = [
    "I have come from the Board with a letter, and the letter says the light is to be automatic by spring.",
    "You will forgive me, but the figures do not lie, and the figures say one keeper is enough.",
    "I do not know about the sea. I know about paraffin, and paraffin costs money.",
    "There's a boat missing from the north shore since Tuesday, and nobody will say it out loud.",
    "My mother said the light went out once, the winter of the great frost, and three ships came in on the rocks.",
    "Sit down, sit down, the kettle's on, and nobody drowns while the kettle's on.",
    "If you want my opinion, and nobody ever does, that tower is the only honest thing in this village.",
    "I'll have a pint, and I'll have it before the Inspector has his say, thank you.",
    "The herring are late this year, and when the herring are late, everything is late.",
    "Write it in your book, sir: the keeper was awake, and the lamp was lit, and the ships were safe.",
    "I measured the stair this morning. Two hundred and twelve steps. I shall not measure it again.",
    "They say the clockwork was made in Glasgow, and they say a great many things in Glasgow.",
    "Mind the rope, mind the step, and mind your manners, there's a lady present.",
    "Nobody in this house has ever been late for the lamp, not once, not in sixty years.",
]
PROSE_PARTS = [
    ("I have", "You have", "We have", "The Board has", "Nobody has", "Somebody has"),
    ("seen", "counted", "written down", "forgotten", "heard about", "lost"),
    ("the oil", "the boats", "the log-book", "the tide tables", "the Captain's letter", "the keys to the tower"),
    ("and that is the end of it.", "and I'll thank you not to laugh.", "before the tide turned.",
     "which is more than I can say for the rest of you.", "and nobody asked me why.", "in the proper order."),
]


def verse_line() -> str:
    if rng.random() < 0.18:
        return rng.choice(FIXED_VERSE)
    line = f"{rng.choice(OPENINGS)} {rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(CLOSINGS)}"
    return line[0].upper() + line[1:] + rng.choice([",", ".", ";", "!", ".", ","])


def prose_speech() -> str:
    sentences = []
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.45:
            sentences.append(rng.choice(PROSE))
        else:
            sentences.append(" ".join(rng.choice(part) for part in PROSE_PARTS))
    return " ".join(sentences)


def direction(cast) -> str:
    a, b = rng.sample(cast, 2)
    pron = "her" if a in ("MAREN", "ELSIE", "MRS. PELL") else "him"
    return "[" + rng.choice(DIRECTIONS).format(a=a.title() if a.isupper() else a, b=b.title(), pron=pron) + "]"


def speech(speaker: str) -> str:
    if speaker in PROSE_SPEAKERS:
        body = prose_speech()
    else:
        lines = [verse_line() for _ in range(rng.randint(1, 5))]
        lines[-1] = lines[-1].rstrip(",;") + ("." if lines[-1][-1] in ",;" else "")
        body = "\n".join(lines)
    return f"{speaker}.\n{body}\n"


def scene(act: int, number: int) -> str:
    cast = rng.sample(VERSE_SPEAKERS, 3) + rng.sample(PROSE_SPEAKERS, rng.randint(1, 2))
    parts = [f"SCENE {roman(number)}. {rng.choice(PLACES)}\n", direction(cast) + "\n"]
    previous = None
    for _ in range(rng.randint(12, 22)):
        speaker = rng.choice([c for c in cast if c != previous])
        parts.append(speech(speaker))
        previous = speaker
        if rng.random() < 0.15:
            parts.append(direction(cast) + "\n")
    parts.append("[Exeunt.]\n")
    return "\n".join(parts)


def roman(n: int) -> str:
    return ["I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X", "XI", "XII", "XIII", "XIV"][n - 1]


def main() -> None:
    out = ["THE LIGHTHOUSE KEEPERS\nA Play in Five Acts\n\nDRAMATIS PERSONAE\n"]
    for name, what in [("MAREN", "keeper of the light"), ("TOBIAS", "her brother"),
                       ("OLD HALVARD", "the former keeper, their father"), ("ELSIE", "a girl of the village"),
                       ("CAPTAIN ROOK", "master of the packet boat"), ("THE INSPECTOR", "from the Lighthouse Board"),
                       ("FIRST FISHERMAN", ""), ("SECOND FISHERMAN", ""), ("MRS. PELL", "keeps the inn")]:
        out.append(f"{name}{', ' + what if what else ''}.")
    out.append("")
    for act in range(1, 6):
        out.append(f"\nACT {roman(act)}.\n")
        number = 0
        while len("\n".join(out).encode()) < TARGET_BYTES * act / 5:
            number += 1
            out.append(scene(act, number))
    out.append("\nTHE END\n")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "the_lighthouse_keepers.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(out))
    print(f"wrote {path}: {os.path.getsize(path):,} bytes")


if __name__ == "__main__":
    main()
