from bgm import vocab
from bgm.server import serve
from services.music.servicer import build


def main() -> None:
    serve(vocab.MUSIC.name, build)


if __name__ == "__main__":
    main()
