from bgm import vocab
from bgm.server import serve
from services.mixer.servicer import build


def main() -> None:
    serve(vocab.MIXER.name, build)


if __name__ == "__main__":
    main()
