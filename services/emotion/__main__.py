from bgm import vocab
from bgm.server import serve
from services.emotion.servicer import build


def main() -> None:
    serve(vocab.EMOTION.name, build)


if __name__ == "__main__":
    main()
