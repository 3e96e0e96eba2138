"""Questions that ask for a long description of the picture, split into fixed train and held-out phrasings."""

from __future__ import annotations

import re

TRAIN_QUESTIONS: tuple[str, ...] = (
    "Describe the image in detail.",
    "What shapes and colours can you see in this picture?",
    "Tell me everything about this image.",
    "Write a detailed description of the objects in the picture and where they are.",
    "What is in this image?",
    "Can you describe what you see here?",
    "Give a thorough description of this picture.",
    "List every object in the image along with its colour, size and position.",
    "Please explain what this image contains.",
    "What does this picture show?",
    "Describe each shape in the image and say where it is located.",
    "How would you describe this image to someone who cannot see it?",
    "Walk me through the contents of this picture, row by row.",
    "What objects appear in the image, and what colours are they?",
    "Provide a detailed caption for this image.",
    "Summarise everything visible in this picture.",
    "Which shapes are shown, how many of each are there, and where are they?",
    "Describe the layout of the shapes in this image.",
    "I'd like a full description of this picture, please.",
    "What can be seen in each row of the image?",
    "Explain the arrangement of coloured shapes in this picture.",
    "Look at the image and describe all of the shapes you notice.",
    "Write a paragraph describing this image.",
    "Give me a complete account of the objects in the picture.",
    "Could you tell me what is drawn in this image?",
    "Describe the sizes, colours and positions of the objects shown.",
    "What is going on in this picture? Please be specific.",
    "Report every shape you can find in the image and its location.",
    "Carefully describe the contents of the image.",
    "What would you say this picture contains?",
    "Break down this image for me: what is where?",
    "Name all the coloured shapes in this image and where each one sits.",
    "Imagine explaining this picture over the phone. What would you say?",
    "Provide an inventory of the shapes in the image.",
    "Detail the objects in this picture, including how many there are.",
    "Tell me about the shapes in this image and their positions.",
)

HELDOUT_QUESTIONS: tuple[str, ...] = (
    "Describe this picture as precisely as you can.",
    "What do you notice when you look at this image?",
    "Give a detailed rundown of everything shown in the picture.",
    "Which objects are present in the image, and where are they placed?",
    "Can you paint a picture in words of what this image shows?",
    "Explain in detail what this image depicts.",
    "Enumerate the shapes in this picture with their colours and locations.",
    "Tell me what you can see in the picture, from top to bottom.",
    "What objects are visible here? Describe them fully.",
    "Compose a careful description of the image for a blind reader.",
    "Please catalogue every item in this image.",
    "How are the shapes in this picture arranged, and what do they look like?",
)


def normalised_words(question: str) -> tuple[str, ...]:
    """Lowercased words with punctuation removed ("I'd like..." -> ("id", "like", ...))."""
    return tuple(re.sub(r"[^a-z0-9\s]", "", question.lower()).split())


def word_edit_distance(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    """Levenshtein distance counted in whole words (insert, delete or substitute one word)."""
    previous = list(range(len(b) + 1))
    for i, word_a in enumerate(a, start=1):
        current = [i]
        for j, word_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (word_a != word_b)))
        previous = current
    return previous[-1]
