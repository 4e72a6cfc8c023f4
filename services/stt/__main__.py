from bgm import vocab
from bgm.server import serve
from services.stt.servicer import build


def main() -> None:
    serve(vocab.STT.name, build)


if __name__ == "__main__":
    main()
