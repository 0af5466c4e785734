"""A 64-token tokenizer.json for the tiny fixture model tests/data/llama/llama (vocab_size 64), so that
examples/lm_finetune's checkpoint mode (--model DIR --data FILE) runs in ctest on a real Hugging Face
tokenizer file. Trained by the `tokenizers` package's BpeTrainer on train.txt (written here too: a
small seeded text of simple English sentences), configured like Llama 2's SentencePiece-style BPE
(Metaspace pre-tokenizer and decoder, <unk> for characters outside the 64 tokens), with <unk>, <s>,
</s> at ids 0, 1, 2 as the fixture's config.json has them (bos 1, eos 2).

    ~/.cache/peft-peer/bin/python benchmarks/peer/make_lm_tiny_tokenizer.py tests/data/llama/tokenizer64
"""
import os
import random
import sys

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def text() -> str:
    rng = random.Random(64)
    subjects = ["the cat", "a dog", "the old man", "my sister", "the bird", "a small fox", "the teacher"]
    verbs = ["sees", "likes", "finds", "eats", "takes", "wants", "meets"]
    objects = ["the red ball", "a green apple", "the big tree", "some bread", "the river", "a little house"]
    tails = ["in the morning", "at night", "near the sea", "after the rain", "every day", "with a smile"]
    paragraphs = []
    for _ in range(60):
        sentences = []
        for _ in range(rng.randint(2, 4)):
            s = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(tails)}."
            sentences.append(s[0].upper() + s[1:])
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs) + "\n"


def main() -> None:
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    corpus = text()
    with open(os.path.join(out, "train.txt"), "w") as f:
        f.write(corpus)
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=64, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=28,
                                  show_progress=False)
    tok.train_from_iterator(corpus.split("\n\n"), trainer)
    assert tok.get_vocab_size() <= 64, tok.get_vocab_size()
    assert [tok.token_to_id(t) for t in ["<unk>", "<s>", "</s>"]] == [0, 1, 2]
    tok.save(os.path.join(out, "tokenizer.json"))
    print(f"tokenizers {tokenizers.__version__}: vocab {tok.get_vocab_size()}, "
          f"{len(tok.encode(corpus).ids)} tokens for {len(corpus)} bytes")


if __name__ == "__main__":
    main()
