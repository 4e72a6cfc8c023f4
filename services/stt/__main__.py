from bgm.server import serve
from services.stt.servicer import build


def main() -> None:
    serve("stt", build)


if __name__ == "__main__":
    main()
